"""The one error a sharded run raises for its own failures (bad settings are ValueErrors)."""


class DistributedError(RuntimeError):
    """The sharded run could not finish; what was recorded stays in results.jsonl."""
