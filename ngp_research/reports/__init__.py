"""Parameterised clinical review reports (papermill) and their provenance."""
