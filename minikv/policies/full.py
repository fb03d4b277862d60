"""The full cache: keeps every entry. The reference every compressed policy is judged against."""
from .base import Policy


class FullCache(Policy):
    name = "full"

    def __init__(self, budget=None):
        super().__init__(None)   # a budget means nothing here
