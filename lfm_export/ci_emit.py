"""`lfm-export matrix SPEC --emit github|gitlab`: the CI's own pipeline for a matrix spec, so the exports spread
over the CI's runners (one job per entry) instead of over a scheduler of ours.

Both pipelines do the same, in order: one job per entry runs `lfm-export matrix SPEC --run --only ID` and keeps
its output folder; a report job gathers them (`--report`: the combined report, and whether a gate failed),
fetches the base branch's gathered outputs, runs `lfm-export compare base head` and posts the comment on the
pull / merge request. `examples/ci/` holds both, emitted from `examples/ci/matrix.yaml`.
"""

from __future__ import annotations

import json

from lfm_export.matrix import Spec

OUT = "matrix-out"
BASE = "matrix-base"
COMMENT = "comment.md"
DEFAULT_FAIL_ON = "kl=+10%,size=+2%,decode=-5%"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's quoting is valid YAML)."""
    return json.dumps(text)


def _extra(backend: str) -> str:
    from lfm_export.backends import get

    return get(backend).install


def github(spec: Spec, spec_path: str | None = None) -> str:
    """A GitHub Actions workflow: `export` (a job per entry, `strategy.matrix.include`) then `report`."""
    path = spec_path or spec.path.as_posix()
    python = spec.ci.get("python", "3.11")
    runs_on = spec.ci.get("runs_on", "ubuntu-latest")
    fail_on = spec.ci.get("fail_on", DEFAULT_FAIL_ON)
    include = []
    for e in spec.entries:
        include += [
            f"          - id: {_q(e.id)}",
            f"            slug: {_q(e.slug)}",
            f"            extra: {_q(_extra(e.backend))}",
        ]
    setup = [
        "      - uses: actions/checkout@v5",
        "      - uses: actions/setup-python@v6",
        "        with:",
        f"          python-version: {_q(python)}",
    ]
    lines = [
        f"# Emitted by `lfm-export matrix {path} --emit github`: edit the spec and emit again.",
        "name: lfm-export",
        "on:",
        "  pull_request:",
        "  push:",
        "    branches: [main]",
        "permissions:",
        "  contents: read",
        "defaults:",
        "  run:",
        "    shell: bash  # -eo pipefail: a failing lfm-export fails its step through a pipe too",
        "jobs:",
        "  export:",
        "    name: export ${{ matrix.id }}",
        f"    runs-on: {runs_on}",
        "    strategy:",
        "      fail-fast: false",
        "      matrix:",
        "        include:",
        *include,
        "    steps:",
        *setup,
        "      - name: Install",
        '        run: pip install -e ".[${{ matrix.extra }}]"',
        "      - name: Export and gate",
        "        env:",
        "          ENTRY: ${{ matrix.id }}",
        f'        run: lfm-export matrix {path} --run --only "$ENTRY" -o {OUT}',
        "      - name: Keep the output",
        "        if: always()",
        "        uses: actions/upload-artifact@v6",
        "        with:",
        "          name: lfm-export-${{ matrix.slug }}",
        f"          path: {OUT}",
        "          retention-days: 30",
        "  report:",
        "    needs: export",
        "    if: always()",
        f"    runs-on: {runs_on}",
        "    permissions:",
        "      actions: read",
        "      contents: read",
        "      pull-requests: write",
        "    steps:",
        *setup,
        "      - name: Install",
        "        run: pip install -e .",
        "      - name: Gather the outputs",
        "        uses: actions/download-artifact@v7",
        "        with:",
        "          pattern: lfm-export-*",
        f"          path: {OUT}",
        "          merge-multiple: true",
        "      - name: Combined report and gate",
        "        id: gate",
        "        continue-on-error: true",
        f'        run: lfm-export matrix {path} --report -o {OUT} | tee -a "$GITHUB_STEP_SUMMARY"',
        "      - name: Keep the combined report",
        "        uses: actions/upload-artifact@v6",
        "        with:",
        "          name: lfm-export-report",
        f"          path: {OUT}",
        "          retention-days: 30",
        "      - name: Fetch the base branch's outputs",
        "        if: github.event_name == 'pull_request'",
        "        env:",
        "          GH_TOKEN: ${{ github.token }}",
        "          BASE_REF: ${{ github.base_ref }}",
        "          WORKFLOW: ${{ github.workflow }}",
        "        run: |",
        '          run_id=$(gh run list --repo "$GITHUB_REPOSITORY" --workflow "$WORKFLOW" --branch "$BASE_REF" \\',
        "            --event push --status success --limit 1 --json databaseId --jq '.[0].databaseId')",
        '          if [ -n "$run_id" ]; then',
        f'            gh run download "$run_id" --repo "$GITHUB_REPOSITORY" --name lfm-export-report --dir {BASE}',
        "          fi",
        "      - name: Compare with the base branch",
        "        id: compare",
        f"        if: github.event_name == 'pull_request' && hashFiles('{BASE}/matrix.json') != ''",
        "        continue-on-error: true",
        f"        run: lfm-export compare {BASE} {OUT} --fail-on {_q(fail_on)} --format github --comment {COMMENT}",
        "      - name: Comment on the pull request",
        f"        if: github.event_name == 'pull_request' && hashFiles('{COMMENT}') != ''",
        "        env:",
        "          GH_TOKEN: ${{ github.token }}",
        "          PR: ${{ github.event.pull_request.number }}",
        f'        run: gh pr comment "$PR" --repo "$GITHUB_REPOSITORY" --body-file {COMMENT}',
        "      - name: Fail on a gate or a regression",
        "        if: steps.gate.outcome == 'failure' || steps.compare.outcome == 'failure'",
        "        run: exit 1",
    ]
    return "\n".join(lines) + "\n"


def gitlab(spec: Spec, spec_path: str | None = None) -> str:
    """A GitLab CI pipeline: `lfm-export` (a job per entry, `parallel:matrix`) then `lfm-export-report`."""
    path = spec_path or spec.path.as_posix()
    image = spec.ci.get("image", f"python:{spec.ci.get('python', '3.11')}")
    fail_on = spec.ci.get("fail_on", DEFAULT_FAIL_ON)
    matrix = []
    for e in spec.entries:
        matrix += [f"      - ENTRY: {_q(e.id)}", f"        EXTRA: {_q(_extra(e.backend))}"]
    api = "$CI_API_V4_URL/projects/$CI_PROJECT_ID"
    lines = [
        f"# Emitted by `lfm-export matrix {path} --emit gitlab`: edit the spec and emit again.",
        "stages: [export, report]",
        "",
        "workflow:",
        "  rules:",
        '    - if: $CI_PIPELINE_SOURCE == "merge_request_event"',
        "    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH",
        "",
        "lfm-export:",
        "  stage: export",
        f"  image: {image}",
        "  parallel:",
        "    matrix:",
        *matrix,
        "  script:",
        '    - pip install -e ".[$EXTRA]"',
        f'    - lfm-export matrix {path} --run --only "$ENTRY" -o {OUT}',
        "  artifacts:",
        "    when: always",
        f"    paths: [{OUT}/]",
        "    expire_in: 30 days",
        "",
        "lfm-export-report:",
        "  stage: report",
        f"  image: {image}",
        "  when: always",
        "  script:",
        "    - pip install -e .",
        f"    - lfm-export matrix {path} --report -o {OUT} || gate=$?",
        "    - |",
        '      if [ -n "$CI_MERGE_REQUEST_IID" ]; then',
        '        curl --silent --location --fail --header "JOB-TOKEN: $CI_JOB_TOKEN" --output base.zip \\',
        f'          "{api}/jobs/artifacts/$CI_MERGE_REQUEST_TARGET_BRANCH_NAME/download?job=lfm-export-report" \\',
        f"          && mkdir -p {BASE} && unzip -q base.zip -d base-zip && cp -r base-zip/{OUT}/. {BASE}/ || true",
        "      fi",
        "    - |",
        f"      if [ -f {BASE}/matrix.json ]; then",
        f"        lfm-export compare {BASE} {OUT} --fail-on {_q(fail_on)} --comment {COMMENT} || regressed=$?",
        "      fi",
        "    - |",
        f'      if [ -f {COMMENT} ] && [ -n "$LFM_EXPORT_NOTE_TOKEN" ]; then',
        '        curl --silent --fail --request POST --header "PRIVATE-TOKEN: $LFM_EXPORT_NOTE_TOKEN" \\',
        f'          --data-urlencode "body@{COMMENT}" "{api}/merge_requests/$CI_MERGE_REQUEST_IID/notes"',
        "      fi",
        '    - test -z "$gate" && test -z "$regressed"',
        "  artifacts:",
        "    when: always",
        f"    paths: [{OUT}/, {COMMENT}]",
        "    expire_in: 30 days",
    ]
    return "\n".join(lines) + "\n"


def emit(kind: str, spec: Spec, spec_path: str | None = None) -> str:
    return {"github": github, "gitlab": gitlab}[kind](spec, spec_path)
