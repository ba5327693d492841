"""Thin click commands, one per DVC stage: parse options, build a config, call one pipeline function."""
