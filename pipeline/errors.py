"""The one error type users see: a problem in their input, named together with its fix."""


class KdcacheError(Exception):
    """Bad input or an unusable artefact. The message says what is wrong and what to do."""
