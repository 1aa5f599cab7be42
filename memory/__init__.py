"""Budgets, smart offload, block streaming, soft/force unload and the MemoryTracker."""
