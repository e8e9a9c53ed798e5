"""``python -m spendgate.bench``: the same command as ``spendgate bench``."""

from __future__ import annotations

# The guard matters: the load generator's processes are spawned, and spawning imports the main module.
if __name__ == "__main__":
    from spendgate.bench.command import main

    main()
