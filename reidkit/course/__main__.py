"""``python -m reidkit.course``: every notebook measured against the course's rules."""

import sys

from reidkit.course.lesson_rules import main

raise SystemExit(main(sys.argv[1:]))
