"""The build pipeline: data, trial training, successive halving, model library, selection, export."""
