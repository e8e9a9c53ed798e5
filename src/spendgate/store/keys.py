"""Every Redis key spendgate uses is built here, and nowhere else.

Keys of one account share the Redis Cluster hash tag ``{<account>}``, so a script can touch a whole chain
atomically on a cluster while accounts spread over the shards. A deployment-wide prefix (``sg`` by default)
keeps spendgate's keys apart from anything else in the same Redis, and lets tests use a prefix of their own.
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class Keys:
    """Builds the keys of one deployment (one prefix)."""

    def __init__(self, prefix: str = "sg") -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(f"key prefix {prefix!r} must be 1-32 letters, digits, '_', '.' or '-'")
        self.prefix = prefix

    # Deployment-wide keys (no hash tag).

    def accounts(self) -> str:
        """The set of every account id."""
        return f"{self.prefix}:accounts"

    def node_index(self, node_id: str) -> str:
        """Maps a node id (unique across the deployment) to its account id."""
        return f"{self.prefix}:node:{node_id}"

    def token_index(self, token_hash: str) -> str:
        """A token's deployment-wide record (role, scope, account), found by the hash of the secret."""
        return f"{self.prefix}:tok:{token_hash}"

    def tokens(self) -> str:
        """The set of every token hash."""
        return f"{self.prefix}:tokens"

    # Keys of one account, all in its hash slot.

    def account_tag(self, account_id: str) -> str:
        """The prefix every key of one account starts with."""
        return f"{self.prefix}:{{{account_id}}}"

    def node(self, account_id: str, node_id: str) -> str:
        """A node's hash: its configuration and its window counters."""
        return f"{self.account_tag(account_id)}:n:{node_id}"

    def hold(self, account_id: str, authorization_id: str) -> str:
        """One authorization's hold record."""
        return f"{self.account_tag(account_id)}:h:{authorization_id}"

    def holds(self, account_id: str) -> str:
        """The zset of an account's open holds, scored by expiry in milliseconds."""
        return f"{self.account_tag(account_id)}:holds"

    def idempotency(self, account_id: str, scope: str, key: str) -> str:
        """The stored answer to one idempotency key within a scope (a wallet id)."""
        return f"{self.account_tag(account_id)}:i:{scope}:{key}"

    def events(self, account_id: str) -> str:
        """The account's live event feed (a capped stream of decisions, captures, alerts and freezes)."""
        return f"{self.account_tag(account_id)}:events"

    def nodes(self, account_id: str) -> str:
        """The set of an account's node ids."""
        return f"{self.account_tag(account_id)}:nodes"

    def token(self, account_id: str, token_hash: str) -> str:
        """A token's copy in its account's slot, which the scripts check in the same step as a decision."""
        return f"{self.account_tag(account_id)}:tok:{token_hash}"

    def outbox(self, account_id: str) -> str:
        """The account's ledger outbox stream of settled transactions."""
        return f"{self.account_tag(account_id)}:outbox"
