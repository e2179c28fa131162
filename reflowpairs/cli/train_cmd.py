"""Commands registered on the reflowpairs app (filled in by its own issue)."""
