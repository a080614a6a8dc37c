"""Pipeline stages. ``python -m tasks.<stage>`` is what dvc.yaml runs.

Each stage reads only the params sections it declares in dvc.yaml and writes only its declared outs.
"""
