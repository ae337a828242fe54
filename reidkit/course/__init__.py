"""The course: the run folder notebooks share, the papermill reproduction, report.md, the lesson
rules, and notebook 05's helpers."""
