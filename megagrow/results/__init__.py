"""Results of experiments read off run logs (the savings report)."""
