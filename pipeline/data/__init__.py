"""Corpus sources and the Arrow token store: row i of a split is the unit every later stage indexes by."""
