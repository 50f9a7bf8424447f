"""klest inside real trainers (optional extras; importing this package imports no trainer).

- :mod:`klest.integrations.trl`: ``KlestGRPOTrainer``, a drop-in TRL ``GRPOTrainer`` whose KL
  term is klest's (``pip install 'klest[trl]'``; TRL 1.16.0). Importing it imports TRL.

See docs/trainers.md for each adapter, its pitfalls, the KL controller and a measured training run.
"""

__all__: list[str] = []
