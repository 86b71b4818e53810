"""Helpers shared by the other packages: atomic file writes (:mod:`.files`), memory readings
(:mod:`.memory`)."""
