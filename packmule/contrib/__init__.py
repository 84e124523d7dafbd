"""Integrations of packmule with other frameworks, each an optional face on top of packmule's core."""
