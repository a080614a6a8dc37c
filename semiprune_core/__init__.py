"""semiprune: label-efficient dataset pruning.

The library is pure and importable: no Prefect, no DVC. Stages in ``tasks/`` and flows in
``flows/`` wrap it.
"""

__version__ = "0.1.0"
