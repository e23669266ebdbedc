"""Building blocks of the OpenMythos architecture, one concept per file."""
