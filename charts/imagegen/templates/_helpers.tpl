{{/* Names, labels and the checks every render runs. */}}

{{- define "imagegen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imagegen.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imagegen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imagegen.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "imagegen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imagegen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagegen.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagegen.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "imagegen.secretName" -}}
{{- default (include "imagegen.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "imagegen.hasSecret" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKeys .Values.auth.feedbackSecret }}true{{ end }}
{{- end }}

{{/* Refuse settings that cannot work, with the reason. */}}
{{- define "imagegen.validate" -}}
{{- if and .Values.d3po.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "d3po.enabled=true needs replicaCount=1 (got %d): the trainer learns from one pod's trajectory buffer and publishes adapters from it, so there is one trainer per deployment until training scales out. Set replicaCount=1, or d3po.enabled=false to serve several replicas." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.d3po.enabled .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}
{{- fail "d3po.enabled=true cannot be combined with autoscaling beyond 1 replica (one trainer per deployment): disable autoscaling or training." }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.server.drainTimeoutSeconds) (int .Values.lifecycle.preStopSleepSeconds)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + server.drainTimeoutSeconds (%d): otherwise in-flight requests are killed mid-drain." (int .Values.terminationGracePeriodSeconds) (add (int .Values.server.drainTimeoutSeconds) (int .Values.lifecycle.preStopSleepSeconds))) }}
{{- end }}
{{- if and (ne .Values.model.source "builtin") (ne .Values.model.source "pvc") (ne .Values.model.source "hostPath") (ne .Values.model.source "initContainer") }}
{{- fail (printf "model.source must be builtin, pvc, hostPath or initContainer (got %q)" .Values.model.source) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.model.source "initContainer") (not .Values.model.initContainer.image) }}
{{- fail "model.source=initContainer needs model.initContainer.image" }}
{{- end }}
{{- end }}
