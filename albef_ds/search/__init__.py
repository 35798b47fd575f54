"""Search a collection with an ALBEF checkpoint: the library of `python -m albef_ds.index`,
`python -m albef_ds.search` (this package's __main__) and `python -m albef_ds.serve`. See
docs/search.md."""
