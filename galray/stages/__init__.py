"""One module per `galray <verb>` (the Ray layer): each holds its job config and the one function the CLI calls.

Stages never import each other (only ``demo`` runs the others, in order); what two stages share lives
in ``galray.data`` (preprocessing, store contracts), ``galray.models``, ``galray.train`` or in the two
helpers here, ``pool`` (actor-pool sizing) and ``summary`` (the summary line every stage prints).
"""
