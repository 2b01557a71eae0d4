"""End-to-end recipes: every step from nothing to a shipped model, in one resumable command."""
