"""Checkpoints: ``model`` (one model + its config, ``save_model``), ``training`` (a run's Orbax
checkpoints: state, data position, config) and ``load`` (a model from any of these or from
OpenMythos weights: ``load_model``)."""
