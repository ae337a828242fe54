"""The bottom floor: the device and its precision, seeding, atomic files and safe checkpoint reads,
progress bars. Imports nothing else from the kit."""
