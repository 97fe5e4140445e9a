"""Outer sampling loops and their schedules. Samplers own no parameters and take an explicit generator."""
