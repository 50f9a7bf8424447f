"""klest inside real trainers (optional extras; importing this package imports no trainer).

- :mod:`klest.integrations.trl`: ``KlestGRPOTrainer``, a drop-in TRL ``GRPOTrainer`` whose KL
  term is klest's (``pip install 'klest[trl]'``; TRL 1.16.0). Importing it imports TRL.
- :mod:`klest.integrations.verl`: ``install()`` makes ``"klest:<preset or option>"`` valid
  wherever verl computes a KL (``kl_loss_type``, ``algorithm.kl_penalty``, distillation), and
  ``klest_ppo_loss`` for ``set_loss_fn`` (``pip install 'klest[verl]'``; verl 0.9.1).
- :mod:`klest.integrations.openrlhf`: ``install()`` makes ``"klest:..."`` valid
  ``--algo.kl.estimator`` values (``pip install 'klest[openrlhf]'``; OpenRLHF 0.11.2).

See docs/trainers.md for each adapter, its pitfalls, the KL controller and a measured training run.
"""

__all__: list[str] = []
