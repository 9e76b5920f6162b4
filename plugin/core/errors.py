"""One error type for bad user input, so every front end can show it as one line."""


class InputError(ValueError):
    """Bad input: the message names the input, the problem and the fix."""

    def __init__(self, subject: object, problem: str, fix: str) -> None:
        self.subject = str(subject)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.subject}: {problem}. {fix}")
