{{/* Chart name, or nameOverride. */}}
{{- define "megamoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: fullnameOverride, else the release name (with the chart name
appended unless it is already in it). 40 characters at most, so that "<fullname>-etcd-headless"
and the StatefulSet's pod names stay within the limits of DNS labels.
*/}}
{{- define "megamoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "megamoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "etcd"). */}}
{{- define "megamoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "megamoe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All standard labels of one component: (dict "ctx" $ "component" "etcd"). */}}
{{- define "megamoe.labels" -}}
{{ include "megamoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: megamoe
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "megamoe.chart" .ctx }}
{{- end }}

{{/* The control plane image. */}}
{{- define "megamoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Whether the chart runs etcd itself. */}}
{{- define "megamoe.etcdInternal" -}}
{{- if not .Values.etcd.external.endpoint }}true{{ end }}
{{- end }}

{{/* The etcd endpoint the control plane and the workers use. */}}
{{- define "megamoe.etcdEndpoint" -}}
{{- if .Values.etcd.external.endpoint }}
{{- .Values.etcd.external.endpoint }}
{{- else }}
{{- printf "http://%s-etcd:2379" (include "megamoe.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the API token. */}}
{{- define "megamoe.tokenSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-token" (include "megamoe.fullname" .)) }}
{{- end }}

{{/* Name of the checkpoint PersistentVolumeClaim. */}}
{{- define "megamoe.checkpointsClaim" -}}
{{- .Values.checkpoints.existingClaim | default (printf "%s-checkpoints" (include "megamoe.fullname" .)) }}
{{- end }}

{{/* storageClassName line: empty class = the cluster default (no line), "-" = "". */}}
{{- define "megamoe.storageClass" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
serve.json, the file `megamoe serve --config` reads (camelCase keys; service/serve.py).
The checksum/config annotation of the Deployment hashes it, so a change rolls the pod.
*/}}
{{- define "megamoe.serveConfig" -}}
{{- $fullname := include "megamoe.fullname" . }}
{{- $etcd := include "megamoe.etcdEndpoint" . }}
{{- $pullSecrets := list }}
{{- range .Values.imagePullSecrets }}
{{- $pullSecrets = append $pullSecrets .name }}
{{- end }}
{{- $w := .Values.workers }}
{{- $kube := dict
  "namespace" .Release.Namespace
  "release" .Release.Name
  "image" ($w.image | default (include "megamoe.image" .))
  "imagePullPolicy" .Values.image.pullPolicy
  "imagePullSecrets" $pullSecrets
  "serviceAccountName" (printf "%s-worker" $fullname)
  "cpu" ($w.resources.cpu | toString)
  "memory" ($w.resources.memory | toString)
  "gpuResource" $w.gpuResource
  "nodeSelector" ($w.nodeSelector | default dict)
  "tolerations" ($w.tolerations | default list)
  "priorityClassName" $w.priorityClassName
  "volumeClaim" (include "megamoe.checkpointsClaim" .)
  "volumeMountPath" $.Values.checkpoints.mountPath
  "metricsPort" (int $w.metricsPort)
  "etcd" $etcd
}}
{{- $config := dict
  "host" "0.0.0.0"
  "port" 50051
  "etcd" $etcd
  "prefix" .Values.etcd.prefix
  "stateDir" "/var/lib/megamoe/state"
  "executor" "kubernetes"
  "metricsPort" 9400
  "metricsHost" "0.0.0.0"
  "kubernetes" $kube
}}
{{- if .Values.auth.enabled }}
{{- $_ := set $config "tokenFile" "/etc/megamoe/token/token" }}
{{- end }}
{{- toPrettyJson $config }}
{{- end }}
