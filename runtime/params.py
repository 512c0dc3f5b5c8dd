"""Call arguments, declared once: a :class:`Param` says an argument's name, kind, range, default and help; the
pipelines declare theirs (``CALL_PARAMS``), and the engine, the HTTP server and the CLI derive what they accept from
those declarations. ``Param.parse`` checks one value (typed from Python, or text from an HTTP form or the command
line); :func:`parse_arguments` checks a request. Every refusal is an :class:`InvalidRequestError` naming the
argument.

Standard library and numpy only (PIL when an image is decoded): the pipelines, the engine and the CLI all import it.
"""

import io
import math
import os

import numpy as np


class InvalidRequestError(ValueError):
    """A request argument is missing, unknown or out of range; ``field`` names it (None: the combination)."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field



IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(data, max_pixels=MAX_IMAGE_PIXELS):
    """An RGB PIL image from encoded bytes (PNG, JPEG, WebP, BMP, GIF); InvalidRequestError for anything else."""
    import PIL.Image
    import PIL.ImageOps

    problem = None
    try:
        with PIL.Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise InvalidRequestError(
                    f"image is {image.width}x{image.height}, more than {max_pixels} pixels; downscale it first",
                    field="image")
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except InvalidRequestError:
        raise
    except PIL.UnidentifiedImageError:  # its message shows the address of the in-memory buffer: say it plainly
        problem = "not an image in a format read here"
        image = None
    except Exception as exc:  # untrusted bytes: any decoder error is the sender's problem, not the server's
        problem = f"{type(exc).__name__}: {brief(exc, 200)}"
        image = None  # a half-decoded image, which the traceback of the error raised below would keep
    # raised out here, not in the except block: the decoder's exception (its traceback holds the frames that hold the
    # bytes and the half-decoded image) is not kept as __context__, so a refused upload is freed at once
    raise InvalidRequestError(
        f"image could not be decoded ({problem}); send a {', '.join(IMAGE_FORMATS)} file", field="image")


MAX_NUMBER_TEXT = 64  # characters of a number given as text (an HTTP form field); longer text is refused unparsed


def brief(value, limit=40):
    """``value`` for an error message: short, and computable for anything a client sends (``str`` of an int over
    4300 digits raises, and a 400-digit one is no help to read)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        bits = abs(int(value)).bit_length()
        if bits > 128:
            return f"{'-' if value < 0 else ''}<an integer of about {int(bits * math.log10(2)) + 1} digits>"
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a client's object whose __str__ fails
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value, name, kind):
    """Accept ints/floats (numpy ones too) and, from HTTP forms, their decimal text; never bools. An "an integer"
    comes back as an int, "a number" as an int or a float (possibly inf or nan: the caller checks the range)."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(f"{name} must be {kind}, got a bool ({value!r})", field=name)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_TEXT:  # before int(): parsing thousands of digits costs, and int() refuses 4300+
            raise InvalidRequestError(
                f"{name} must be {kind} of at most {MAX_NUMBER_TEXT} characters, got {len(text)} characters "
                f"({brief(text)!r})", field=name)
        if not text.isascii() or "_" in text:  # int() and float() also take "1_000" and non-ASCII digits
            raise InvalidRequestError(f"{name} must be {kind} in plain ASCII decimal digits, got {brief(value)!r}",
                                      field=name)
        try:
            return int(text) if kind == "an integer" else float(text)
        except ValueError:
            raise InvalidRequestError(f"{name} must be {kind}, got {brief(value)!r}", field=name) from None
    if isinstance(value, (int, np.integer)):
        return int(value)  # exact, also for "a number": float(10**400) would overflow before the range check
    if isinstance(value, (float, np.floating)):
        number = float(value)  # numpy's long double beyond the float range becomes inf, refused by the caller
        if kind != "an integer":
            return number
        if number.is_integer():
            return int(number)
    raise InvalidRequestError(f"{name} must be {kind}, got {type(value).__name__} {brief(value)}", field=name)


class Param:
    """One call argument: its kind ("int", "float", "choice", "text", "image", "array"), range (for text: the
    longest length), diffusers' ``default`` where the artifact's manifest may record one (None: the artifact or the
    call decides), whether HTTP and the command line offer it, and its command-line ``flag``.

    ``parse`` checks a value (typed from Python, or text from an HTTP form) and returns it in its Python type, or
    raises :class:`InvalidRequestError` naming the argument.
    """

    def __init__(self, name, kind, *, minimum=None, maximum=None, choices=None, required=False, http=True,
                 cli=True, default=None, flag=None, help=""):
        self.name, self.kind, self.minimum, self.maximum = name, kind, minimum, maximum
        self.choices, self.required, self.http, self.help = choices, required, http, help
        self.cli, self.default = cli, default
        self.flag = flag or "--" + name.replace("_", "-")  # its command-line flag, where ``cli`` offers it

    def check(self, value):
        """Check a value a Python caller passed (typed, never text for a number, never a float for an integer):
        it must parse to itself."""
        name = self.name
        if self.kind in ("int", "float") and (isinstance(value, (str, bytes)) or (
                self.kind == "int" and isinstance(value, (float, np.floating)))):
            kind = "an integer" if self.kind == "int" else "a number"
            raise InvalidRequestError(f"{name} must be {kind}, got {type(value).__name__} {brief(value)!r}",
                                      field=name)
        self.parse(value)

    def parse(self, value):
        name = self.name
        if self.kind in ("int", "float"):
            value = _number(value, name, "an integer" if self.kind == "int" else "a number")
            # ints are exact and always finite (math.isfinite(10**400) raises OverflowError); int-float comparisons
            # are exact in Python, so a huge int against a float bound cannot overflow either
            if isinstance(value, float) and not math.isfinite(value):
                bounds = f" in [{self.minimum}, {self.maximum}]" if (self.minimum, self.maximum) != (None, None) else ""
                raise InvalidRequestError(f"{name} must be a finite number{bounds}, got {value!r}", field=name)
            low = self.minimum is not None and value < self.minimum
            if low or (self.maximum is not None and value > self.maximum):
                raise InvalidRequestError(
                    f"{name}={brief(value)} is out of range; it must be in [{self.minimum}, {self.maximum}]",
                    field=name)
            if self.kind == "float" and not isinstance(value, float):
                try:
                    value = float(value)
                except OverflowError:  # only without a maximum: ints in range are exact
                    raise InvalidRequestError(f"{name}={brief(value)} is beyond the float range", field=name) from None
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise InvalidRequestError(f"{name} must be one of {list(self.choices)}, got {brief(value)!r}",
                                          field=name)
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}", field=name)
            if self.maximum is not None and len(value) > self.maximum:
                raise InvalidRequestError(f"{name} has {len(value)} characters, more than {self.maximum}", field=name)
            return value
        if self.kind == "image":
            return self._image(value)
        if self.kind == "array":
            problem = None
            try:
                with np.errstate(over="ignore"):  # float64 beyond the float32 range: inf, refused below
                    array = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int beyond the float range
                problem = brief(exc, 200)
            if problem is not None:
                raise InvalidRequestError(f"{name} must be an array of finite float32 numbers ({problem})", field=name)
            if not np.all(np.isfinite(array)):
                raise InvalidRequestError(f"{name} must be finite (no NaN or inf)", field=name)
            return array
        raise TypeError(f"Param {name!r} has unknown kind {self.kind!r}")

    def _image(self, value):
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image(value)
        if isinstance(value, (str, os.PathLike)):
            raise InvalidRequestError(
                f"{self.name} must be an image (a PIL image, a numpy array or encoded image bytes), not a path or "
                "text; open files with framegraph.runtime.load_image(path), or upload the file over HTTP",
                field=self.name)
        return value  # PIL images and arrays: the pipeline's own checks name what is wrong

    def describe(self):
        """A JSON-ready description (for the server's /info)."""
        out = {"name": self.name, "type": self.kind, "required": self.required}
        for key in ("minimum", "maximum", "choices", "help"):
            value = getattr(self, key)
            if value is not None and value != "":
                out[key] = list(value) if key == "choices" else value
        return out


def parse_arguments(params, arguments, what):
    """Check ``arguments`` against ``params``: unknown names and missing required ones are refused by name."""
    by_name = {p.name: p for p in params}
    unknown = sorted(set(arguments) - set(by_name))
    if unknown:
        raise InvalidRequestError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for {what}; it takes: {', '.join(sorted(by_name))}",
            field=unknown[0])
    parsed = {}
    # the cheap checks first: a request with a bad number is refused before its image is decoded
    for param in sorted(params, key=lambda p: p.kind == "image"):
        value = arguments.get(param.name)
        if value is None:
            if param.required:
                raise InvalidRequestError(f"{param.name} is required for {what}", field=param.name)
            continue
        parsed[param.name] = param.parse(value)
    return {p.name: parsed[p.name] for p in params if p.name in parsed}
