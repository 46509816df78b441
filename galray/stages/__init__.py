"""One module per `galray <verb>` (the Ray layer): each holds its job config and the one function the CLI calls.

Stages never import each other (only ``demo`` runs the others, in order); what two stages share lives
in ``galray.data`` (preprocessing, store contracts), ``galray.models``, ``galray.train`` or in the
helpers here, ``pool`` (actor-pool sizing), ``summary`` (the summary line every stage prints) and
``shard_attempts`` (the per-shard attempt count that bounds retries).
"""
