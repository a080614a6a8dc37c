"""Pipeline stages. ``python -m tasks.<stage>`` is what dvc.yaml runs.

Each stage reads only the params sections it declares in dvc.yaml and writes only its declared outs.
During a flow run a stage starts warm, forked from a server that has imported torch already
(``tasks/_warm_start.py``); without one it starts as any Python process does.
"""

import os as _os

if _os.environ.get("SEMIPRUNE_STAGE_SERVER"):
    from ._warm_start import delegate as _delegate

    _delegate()
