"""reidkit: person re-identification without identity labels (HHCL and DGL), as a course and a
reproduction kit. Every heavy kernel of the notebooks lives here."""

__version__ = "0.1.0"
