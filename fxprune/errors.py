"""The exceptions fxprune raises. Each message names the problem and the fix."""


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be captured as a torch.fx graph.

    The message is short (the reason and the fix); ``details`` holds the front end's full
    error text when it was cut (torch.export's can be pages of graph).
    """

    details: str | None = None


class AnalysisError(FxpruneError):
    """Channel analysis could not run (bad example inputs, unsupported graph outputs...)."""


class PlanError(FxpruneError):
    """A pruning plan is invalid (unknown group, out-of-range or frozen channels...)."""


class WeightError(FxpruneError):
    """The model's weights cannot be ranked (NaN or infinite parameters or buffers)."""


class VerificationError(FxpruneError):
    """A rewritten graph failed to re-propagate shapes; nothing is emitted."""


class CheckpointError(FxpruneError):
    """A checkpoint folder cannot be pruned as asked (missing files or keys, shapes that
    differ from the analysed model's, a destination that is not a new folder)."""


class SpecError(FxpruneError):
    """A compression spec is invalid; the message names the field."""


class WriteBackError(FxpruneError):
    """A plan cannot be written back into the user's own model class (emit="module"):
    its code hard-codes a size, or its config cannot express the result."""
