"""Fuzz targets for the codecs, run on demand: python -m fuzz.run TARGET --count N (see run.py)."""
