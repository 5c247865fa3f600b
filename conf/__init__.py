"""mhd-sim's Hydra config tree; a package so that it ships inside the wheel."""
