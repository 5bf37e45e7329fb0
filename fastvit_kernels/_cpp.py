"""The cpp backend: loads the C++ extension in csrc/ (not built yet)."""

OPS: dict = {}
UNAVAILABLE_REASON = "the C++ extension is not implemented yet"
