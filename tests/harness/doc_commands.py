"""Command lines shown in README.md and docs/*.md: extracted, expanded from their synopsis form, classified.

Two kinds of text count as a command line:
- every line of a ```sh code block (comments and blank lines dropped);
- every inline code span that starts with `autoport ` or `make `.

A synopsis (`autoport status [ADDRESS] [--json]`) is expanded into concrete lines: each `[...]` group is left
out once and put in once, the first alternative of `a|b` is taken (each alternative in turn for the
sub-command words, e.g. `alias add|remove|list|import`), and placeholders (DIR, NAME, ADDRESS, FILE, ...) get
lab values. tests/unit/test_doc_commands.py parses every `autoport` line with the real argument parser;
tests/e2e/test_doc_commands_lab.py runs the ones a lab can run, as written. Everything else must be listed in
NEEDS_HOST with the reason, so the list cannot grow silently.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# commands that cannot run on a loopback lab, with the reason (exact text as extracted)
NEEDS_HOST: dict[str, str] = {
    "make demo": "installs Debian packages as root first (make install); `autoport demo` itself runs in the e2e test",
    "make test": "runs the whole suite (hours on a shared 2-core machine)",
    "make install": "installs Debian packages and a system user as root",
    "make lint": "run by every engineer before a commit; not a lab command",
    "pip install 'ansible-core>=2.17'": "installs into the caller's Python",
    "cd ansible": "part of the Ansible quick start on an operator's machine",
    "cp inventory.example.yml inventory.yml": "part of the Ansible quick start (tests/e2e/test_ansible.py covers it)",
    "cp group_vars/all.example.yml group_vars/all.yml": "part of the Ansible quick start",
    "$EDITOR inventory.yml group_vars/all.yml": "interactive editor",
    "ansible-playbook -i inventory.yml site.yml --diff": "needs a Debian 12 host over SSH (tests/e2e/test_ansible.py)",
    "ansible-playbook -i localhost, -c local -e autoport_hosts=all -e autoport_prefix=/tmp/ap-x "
    "-e autoport_manage_services=false -e @vars.json ansible/site.yml":
        "deploys onto this machine; tests/e2e/test_ansible.py runs exactly this",
    "systemctl status autoport postfix dovecot": "needs systemd as PID 1 (not on the test machines)",
    ".venv/bin/pytest tests/e2e/test_ansible.py -q": "runs another test module (its own deployment, minutes)",
    ".venv/bin/ansible-lint ansible/": "lint, not a lab command",
    '.venv/bin/pytest -q -m "not e2e" -p no:cacheprovider': "runs the unit tests (docs/testing.md)",
    ".venv/bin/pytest -q tests/e2e/test_identity.py": "runs another test module (docs/testing.md)",
    ".venv/bin/pytest -q tests/e2e/test_identity.py -k attack --durations=0": "runs another test (docs/testing.md)",
    "autoport serve": "the daemon itself; every lab starts it (sidecar/lab/target.py)",
    "autoport --config %s config": "a format string in docs/security.md, expanded by the test that runs it",
    "autoport finalize": "rewrites the target's configuration for good (tests/e2e/test_finalize.py runs it)",
    "autoport lab up --sysroot ROOT --dir ROOT/l/NAME":
        "a lab inside the Debian 13 root (tests/e2e/test_dovecot24.py starts exactly this, in the built root)",
}

PLACEHOLDERS = {
    "DIR": "{lab}",
    "NAME": "sidecar",
    "ADDRESS": "{address}",
    "ADDRESS...": "{address}",
    "FILE": "{lab}/doc-input.txt",
    "SPEC": "{lab}/legacy.toml",
    "N": "2",
}

_SPAN = re.compile(r"`((?:autoport|make) [^`]+)`")


def extract(paths: list[Path] | None = None) -> list[tuple[str, str]]:
    """(file name, command line) in document order, without duplicates."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in paths or DOCS:
        in_sh = False
        cont = ""
        for line in path.read_text().splitlines():
            fence = line.strip()
            if fence.startswith("```"):
                in_sh = not in_sh and fence[3:].strip() in ("sh", "bash", "console", "shell")
                continue
            if in_sh:
                cmd = strip_comment(line.strip())
                if cont:
                    cmd, cont = f"{cont} {cmd}", ""
                if cmd.endswith("\\"):  # continued on the next line
                    cont = cmd[:-1].strip()
                    continue
                if cmd and not cmd.startswith("#") and cmd not in seen:
                    seen.add(cmd)
                    found.append((path.name, cmd))
                continue
            for m in _SPAN.finditer(line.replace("\\|", "|")):
                cmd = m.group(1).strip()
                if cmd not in seen:
                    seen.add(cmd)
                    found.append((path.name, cmd))
    return found


def strip_comment(cmd: str) -> str:
    return re.sub(r"(^|\s+)#.*$", "", cmd).strip()


def _words(cmd: str) -> list[str]:
    """Split a synopsis into words, keeping `[...]` groups whole."""
    words: list[str] = []
    depth = 0
    cur = ""
    for ch in cmd:
        if ch == " " and depth == 0:
            if cur:
                words.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        words.append(cur)
    return words


def expand(cmd: str) -> list[str]:
    """A synopsis -> concrete command lines (see the module docstring)."""
    cmd = strip_comment(cmd)
    if " | " in cmd:  # top-level alternatives: `migrate ADDRESS... | --dormant | --all [--wait]`
        head, _, rest = cmd.partition(" ")
        sub, _, alts = rest.partition(" ")
        parts = [p.strip() for p in alts.split(" | ")]
        tail = _words(parts[-1])
        opt = [w for w in tail if w.startswith("[")]
        parts[-1] = " ".join(w for w in tail if not w.startswith("["))
        return [x for p in parts for x in expand(" ".join([head, sub, p, *opt]))]
    choices: list[list[str]] = []
    for i, w in enumerate(_words(cmd)):
        if w.startswith("[") and w.endswith("]"):
            inner = w[1:-1]
            choices.append(["", *[_concrete(x) for x in _alternatives(inner)]])
        elif "|" in w and i <= 2:  # sub-command words: each in turn
            choices.append(w.split("|"))
        elif "/" in w and i == 2 and not w.startswith(("/", ".")):  # `lab up/down/restart/info`
            choices.append(w.split("/"))
        else:
            choices.append([_concrete(w)])
    lines = {" ".join(x for x in combo if x) for combo in itertools.product(*choices)}
    return sorted(lines)


def _alternatives(inner: str) -> list[str]:
    words = inner.split(" ")
    if len(words) == 2 and "|" in words[1]:  # --format table|csv|json
        return [f"{words[0]} {v}" for v in words[1].split("|")]
    return [inner]


def _concrete(word: str) -> str:
    return " ".join(PLACEHOLDERS.get(w, w.split("|")[0]) for w in word.split(" "))
