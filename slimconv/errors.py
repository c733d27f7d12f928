"""The one error type a user should ever see: a problem and how to fix it, never a traceback."""


class SlimError(Exception):
    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self):
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"
