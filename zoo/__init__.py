"""The model zoo's workshop: training, evaluation and studies of the offline tiny targets.

`spdbench/targets/` only loads models; everything that makes or measures them lives here, one
module per job: `photos` (the training/held-out photo list and its offline fetch), `train_tiny`
(the tiny SD1.5-architecture target), `evaluate_tiny` (held-out figures), `immunization_study`
(attacks vs noise on a tiny target). Each runs as `python -m zoo.<module>`; see
docs/zoo.md. Nothing here is imported by `import spdbench`.
"""
