{{/* The pod template of the serving Deployment and the trainer's: `root` (the chart's
context), `role` (IMAGEGEN_ROLE on NATS) and `labels`. Its lines carry their final indentation. */}}
{{- define "imagegen.podTemplate" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $labels := .labels }}
  template:
    metadata:
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      labels:
        {{- $labels | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "imagegen.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- if and $root.Values.gpu.enabled $root.Values.gpu.runtimeClassName }}
      runtimeClassName: {{ $root.Values.gpu.runtimeClassName }}
      {{- end }}
      {{- if eq $root.Values.model.source "initContainer" }}
      initContainers:
        - name: fetch-model
          image: {{ $root.Values.model.initContainer.image }}
          {{- with $root.Values.model.initContainer.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: model
              mountPath: {{ $root.Values.model.mountPath }}
      {{- end }}
      containers:
        - name: server
          image: {{ include "imagegen.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- with $root.Values.server.extraArgs }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "imagegen.fullname" $root }}
          env:
            {{- if include "imagegen.hasSecret" $root }}
            - name: IMAGEGEN_API_KEYS
              valueFrom:
                secretKeyRef:
                  name: {{ include "imagegen.secretName" $root }}
                  key: api-keys
                  optional: true
            - name: IMAGEGEN_FEEDBACK_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ include "imagegen.secretName" $root }}
                  key: feedback-secret
                  optional: true
            {{- end }}
            {{- if $root.Values.nats.enabled }}
            - name: IMAGEGEN_ROLE
              value: {{ $role }}
            {{- if $root.Values.nats.existingSecret }}
            {{- with $root.Values.nats.urlKey }}
            - name: IMAGEGEN_NATS_URL
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.nats.existingSecret }}
                  key: {{ . }}
            {{- end }}
            {{- if $root.Values.nats.credsKey }}
            - name: IMAGEGEN_NATS_CREDS
              value: /etc/imagegen/nats/creds
            {{- end }}
            {{- end }}
            {{- end }}
            {{- with $root.Values.server.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $root.Values.server.grpcPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $root.Values.server.metricsPort }}
              protocol: TCP
          # Native gRPC probes against grpc.health.v1 (no API key needed).
          startupProbe:
            grpc:
              port: {{ $root.Values.server.grpcPort }}
            periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
          readinessProbe:
            grpc:
              port: {{ $root.Values.server.grpcPort }}
              service: imagegen.v1.ImageGenerator
            periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
          livenessProbe:
            grpc:
              port: {{ $root.Values.server.grpcPort }}
            periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
          lifecycle:
            # Let endpoints drop the pod before SIGTERM starts the drain.
            preStop:
              sleep:
                seconds: {{ $root.Values.lifecycle.preStopSleepSeconds }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- $resources := deepCopy $root.Values.resources }}
            {{- if $root.Values.gpu.enabled }}
            {{- $limits := default (dict) $resources.limits }}
            {{- $_ := set $limits $root.Values.gpu.resourceName (int $root.Values.gpu.count) }}
            {{- $_ := set $resources "limits" $limits }}
            {{- $requests := default (dict) $resources.requests }}
            {{- $_ := set $requests $root.Values.gpu.resourceName (int $root.Values.gpu.count) }}
            {{- $_ := set $resources "requests" $requests }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: data
              mountPath: {{ $root.Values.persistence.mountPath }}
            {{- if ne $root.Values.model.source "builtin" }}
            - name: model
              mountPath: {{ $root.Values.model.mountPath }}
              readOnly: true
            {{- end }}
            {{- if and $root.Values.nats.enabled $root.Values.nats.existingSecret $root.Values.nats.credsKey }}
            - name: nats-creds
              mountPath: /etc/imagegen/nats
              readOnly: true
            {{- end }}
      volumes:
        # The root filesystem is read-only: scratch space for the built-in model and temp files.
        - name: tmp
          emptyDir: {}
        {{- /* On NATS everything learned lives there: the data folder only caches adapters. */}}
        - name: data
          {{- if and $root.Values.persistence.enabled (not $root.Values.nats.enabled) }}
          persistentVolumeClaim:
            claimName: {{ $root.Values.persistence.existingClaim | default (printf "%s-data" (include "imagegen.fullname" $root)) }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- if and $root.Values.nats.enabled $root.Values.nats.existingSecret $root.Values.nats.credsKey }}
        - name: nats-creds
          secret:
            secretName: {{ $root.Values.nats.existingSecret }}
            items:
              - key: {{ $root.Values.nats.credsKey }}
                path: creds
        {{- end }}
        {{- if eq $root.Values.model.source "pvc" }}
        - name: model
          persistentVolumeClaim:
            claimName: {{ $root.Values.model.pvc.claimName }}
            readOnly: true
        {{- else if eq $root.Values.model.source "hostPath" }}
        - name: model
          hostPath:
            path: {{ $root.Values.model.hostPath.path }}
            type: Directory
        {{- else if eq $root.Values.model.source "initContainer" }}
        - name: model
          emptyDir:
            sizeLimit: {{ $root.Values.model.initContainer.sizeLimit }}
        {{- end }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
