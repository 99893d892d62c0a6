"""Keeping data current: the release sensor, schedules and declarative automation."""
