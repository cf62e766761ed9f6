"""Runners that ship with rbit, as examples and for real use."""
