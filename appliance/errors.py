"""One exception family whose messages tell the user what to do next."""


class StreamChatError(Exception):
    """Base class: the message is shown to the user as is (CLI: one line on stderr; UI: in the window)."""


class CheckpointError(StreamChatError):
    """A checkpoint directory is missing files, truncated, or not a ChatGLM-6B checkpoint."""


class BundleError(StreamChatError):
    """A model bundle is corrupt, incomplete or of an unknown format."""


class TokenizerError(StreamChatError):
    """The tokenizer model is missing or does not have ChatGLM-6B's special pieces."""


class PromptError(StreamChatError):
    """A prompt cannot be built within the context budget (e.g. empty query)."""


class EngineError(StreamChatError):
    """An inference engine failed to load or to run."""


class ResourceError(StreamChatError):
    """Not enough memory or disk for the requested work; the message says how much is needed and how much there is."""
