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

{{/* Trainer pods carry their own name label, so the serving Service never selects them. */}}
{{- define "imagegen.trainerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen.name" . }}-trainer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: trainer
{{- end }}

{{- define "imagegen.trainerLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "imagegen.trainerSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imagegen.natsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen.name" . }}-nats
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end }}

{{/* Where NATS is: `nats.url`, else the bundled one (a URL from the Secret overrides both). */}}
{{- define "imagegen.natsUrl" -}}
{{- if .Values.nats.url }}{{ .Values.nats.url }}{{ else if .Values.nats.deploy.enabled }}nats://{{ include "imagegen.fullname" . }}-nats:4222{{ end }}
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
{{- if and .Values.d3po.enabled (not .Values.nats.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "d3po.enabled=true needs replicaCount=1 (got %d) without NATS: one pod's learning store and adapters are on its own volume, so there is one trainer per deployment. Set nats.enabled=true (serving replicas plus one trainer sharing JetStream), replicaCount=1, or d3po.enabled=false." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.d3po.enabled (not .Values.nats.enabled) .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}
{{- fail "d3po.enabled=true cannot be combined with autoscaling beyond 1 replica without NATS (one trainer per deployment): set nats.enabled=true, or disable autoscaling or training." }}
{{- end }}
{{- if and .Values.nats.enabled (not .Values.nats.url) (not .Values.nats.deploy.enabled) (not (and .Values.nats.existingSecret .Values.nats.urlKey)) }}
{{- fail "nats.enabled=true needs a NATS to connect to: nats.url (e.g. the official NATS chart's nats://nats.nats.svc:4222), nats.existingSecret with nats.urlKey, or nats.deploy.enabled=true" }}
{{- end }}
{{- if and (or .Values.nats.urlKey .Values.nats.credsKey) (not .Values.nats.existingSecret) }}
{{- fail "nats.urlKey and nats.credsKey name keys of nats.existingSecret: set nats.existingSecret" }}
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
