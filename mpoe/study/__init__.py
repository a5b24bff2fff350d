"""Studies: several mpoe-train runs and one report, as one command (`mpoe-study NAME`)."""
