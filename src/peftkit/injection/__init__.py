"""Adapter injection: a pure plan of which modules get which adapter layer, then one function that applies it."""
