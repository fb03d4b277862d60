"""The full cache: keeps every entry. The reference every compressed policy is judged against."""
from minikv.errors import BadInput
from minikv.policies.base import Policy

class FullCache(Policy):
    name = "full"
    summary = "keeps every entry (the reference; takes no budget)"
    takes_budget = False

    def __init__(self, budget=None):
        if budget is not None:
            raise BadInput(f"full keeps every entry, so budget {budget!r} would mean nothing; leave the budget out, "
                           f"or pick a policy that takes one (e.g. h2o, snapkv, streaming)")
        super().__init__(None)
