"""The engine: content-addressed store, stage DAG, config schema, distributed ranks.

It knows no experiment and imports nothing from models, interventions or analysis.
"""
