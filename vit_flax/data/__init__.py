"""Data sets: where images and labels come from (sources), before they reach a device."""
