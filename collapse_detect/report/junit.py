"""JUnit XML: one test case per registered check that ran, so CI systems (GitHub, GitLab, Jenkins) list the checks
next to the unit tests. A check fails when it has a finding that gates the exit code (a collapse finding at or
over --fail-on); a crashed check is an <error>; findings that do not gate (warnings under --fail-on fail, info)
are kept in the passing case's system-out."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ..checks import REGISTRY, Severity

# XML 1.0 forbids most control characters even when escaped; a class name from a data file may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text) -> str:
    return _NOT_XML.sub("\ufffd", str(text))


def checks_run(diagnosis) -> list[str]:
    """The checks this diagnosis ran, in registry order (recorded by api.judge; otherwise every check)."""
    ran = diagnosis.metadata.get("checks_run")
    if ran is None:
        ran = list(REGISTRY)
    seen = list(ran)
    for f in diagnosis.findings:  # a finding of an unregistered id still deserves a line
        if f.check_id not in seen:
            seen.append(f.check_id)
    return seen


def render_junit(diagnosis, fail_on: str | None = None) -> str:
    gating = {id(f) for f in diagnosis.gating_findings(fail_on)}
    ids = checks_run(diagnosis)
    meta = diagnosis.metadata
    subject = meta.get("model_name") or meta.get("predictions_file") or "model"
    suite = ET.Element("testsuite", name="collapse-detect", tests=str(len(ids)), time="0")
    props = ET.SubElement(suite, "properties")
    for key, value in (("verdict", diagnosis.verdict(fail_on)), ("fail_on", diagnosis.effective_fail_on(fail_on)),
                       ("exit_code", diagnosis.exit_code(fail_on)), ("model", subject),
                       ("data", meta.get("data_file") or meta.get("predictions_file") or ""),
                       ("rows", diagnosis.stats.get("n", ""))):
        ET.SubElement(props, "property", name=key, value=_clean(value))
    failures = errors = 0
    for check_id in ids:
        spec = REGISTRY.get(check_id)
        case = ET.SubElement(suite, "testcase", name=check_id, classname=f"collapse-detect.{_clean(subject)}",
                             time="0")
        found = [f for f in diagnosis.findings if f.check_id == check_id]
        crashed = [f for f in found if f.severity is Severity.ERROR]
        failed = [f for f in found if id(f) in gating and f.severity is not Severity.ERROR]
        body = "\n".join(f"[{f.severity.value}] {f.summary}" + (f"\nLikely cause: {f.cause}" if f.cause else "")
                         + (f"\nFix: {f.fix.title}" if f.fix else "") for f in found)
        if crashed:
            errors += 1
            el = ET.SubElement(case, "error", message=_clean(crashed[0].summary), type="CheckCrashed")
            el.text = _clean(crashed[0].evidence.get("traceback", crashed[0].summary))
        elif failed:
            failures += 1
            el = ET.SubElement(case, "failure", message=_clean(failed[0].summary),
                               type=f"{failed[0].severity.value}")
            el.text = _clean(body)
        elif found:
            ET.SubElement(case, "system-out").text = _clean(body)
        if spec is not None and not found:
            ET.SubElement(case, "system-out").text = _clean(f"no finding ({spec.measures})")
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suites = ET.Element("testsuites", name="collapse-detect", tests=str(len(ids)), failures=str(failures),
                        errors=str(errors), time="0")
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
