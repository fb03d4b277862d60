"""Loading checkpoints and tokenizers, and converting the default model: the way weights come in."""
from minikv.errors import BadInput

def require(ok: bool, message: str, error: type[Exception] = BadInput) -> None:
    """Raise `error(message)` unless `ok`: one line per check of an input file (the message is built either way)."""
    if not ok:
        raise error(message)
