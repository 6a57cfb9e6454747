"""Errors the engine raises for callers to turn into messages (the service maps them to 4xx)."""


class ModelLoadError(RuntimeError):
    """The model path is missing, unreadable, or not a model transformers can load."""


class UnsupportedModelError(ModelLoadError):
    """The model loads but its architecture or rope type is one the blender cannot place exactly."""


class InvalidRequestError(ValueError):
    """The request cannot be served as given: empty or over-long documents, bad parameters."""


class EngineUnavailableError(RuntimeError):
    """The engine cannot serve anything now (every model server it sends to is down): retry later (503)."""
